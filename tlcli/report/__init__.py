"""Pictures and the HTML report a run is looked at through."""
