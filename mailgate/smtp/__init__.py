"""Receiving: the SMTP listeners (protocol, DATA framing, SASL, policy, addresses)."""
