"""reglue: REGLUE (arXiv 2512.16636) as extract-once + lean-trainer.

`reglue.pipeline` turns images into a Zarr feature cache; `reglue.trainer` trains from that cache.
The only thing they share is the cache contract, `reglue.pipeline.store`.
"""

__version__ = "0.1.0"
