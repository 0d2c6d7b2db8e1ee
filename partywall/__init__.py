"""partywall: property-based tests of tenant isolation for WebSocket agent services."""

__version__ = "0.1.0"
