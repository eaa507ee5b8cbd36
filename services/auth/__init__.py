"""Access control: who the caller is (tokens) and what each role may do."""
