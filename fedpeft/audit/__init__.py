"""Privacy audit: what an honest-but-curious server can rebuild from one client's payload."""
