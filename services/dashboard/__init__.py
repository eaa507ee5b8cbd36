"""The clinician and compliance dashboard: server-rendered pages under /dashboard."""
