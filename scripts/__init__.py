"""Developer scripts: test runner and throwaway services."""
