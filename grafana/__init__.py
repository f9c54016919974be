"""Grafana dashboards and provisioning for streamrec, generated from code (see ``dashboards``)."""
