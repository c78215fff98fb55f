"""The views: how sandbox facts are shown (MIME bundles, later the widget panel)."""
