"""Reliability property tests: bad, extreme and empty inputs through the math layer."""
