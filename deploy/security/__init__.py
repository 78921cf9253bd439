"""Transport security of the local broker: its certificates and the Sluice ACL set."""
