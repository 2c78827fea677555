"""slmify."""
