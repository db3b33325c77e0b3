"""Views: self-contained HTML (offline), circuitsvis where it fits, static PNG."""
