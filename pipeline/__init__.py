"""Stage one: images -> Zarr feature cache (see `store` for the contract)."""
