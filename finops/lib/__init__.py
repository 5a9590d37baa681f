"""Small helpers more than one app of the control plane uses (healthchecks keeps its own in
``hc/lib``): tables as CSV, the organisation's time zone."""
