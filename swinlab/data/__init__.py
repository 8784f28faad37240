"""LightningDataModules, one per dataset family."""

__all__: list[str] = []
