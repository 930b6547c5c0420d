"""Integrations with training libraries (imported only when used: ``gesim.integrations.trl``)."""
