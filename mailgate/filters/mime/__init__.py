"""The MIME walker behind the attachment policy."""
