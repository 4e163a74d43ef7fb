"""Delivering: the scheduler, routing, the SMTP client, bounces and DKIM signing."""
