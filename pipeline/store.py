"""The cache contract: the one module both stages share. (SKELETON: filled in by the extract work.)

A cache is a Zarr v3 group (any fsspec URL; a local folder by default). Sample axis first in
every per-sample array. Layout (format version 1), N = planned samples, P = patch tokens,
D = DINOv2 width, L = number of multi-layer features, zc = VAE latent channels, h = latent side:

  vae_moments   [N, 2*zc, h, h]   float16   posterior mean (ch 0..zc-1) then std (zc..2zc-1), unscaled
  cls           [N, D]            float32   DINOv2 last-layer [CLS] after the final norm
  patches       [N, P, D]         int8      last-layer patch tokens (REPA target), per-token absmax int8
  patches_scale [N, P]            float16   their per-token scale: x ~= q * scale / 127
  layers        [M, P, L*D]       float16   layers 8..11 (normed), channel order [L8|L9|L10|L11], subset only
  layers_index  [M]               int64     global sample index of each `layers` row (evenly spread)
  compressed    [N, c, g, g]      float16   compressor output at the DINO grid (g = sqrt(P)); optional
  labels        [N]               int64     class index (sorted class folders), -1 when unlabelled
  valid         [N]               bool      False for a source that could not be decoded (skipped)

Group attributes `reglue` hold everything needed to reproduce and consume the store (see `CacheMeta`).
Completeness: one marker per finished sample chunk; `complete` is set only after every chunk verifies.
"""
