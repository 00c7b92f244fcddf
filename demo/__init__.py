"""The vehicle demo (``uptane demo``)."""
