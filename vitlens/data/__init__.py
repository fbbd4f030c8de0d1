"""The data layer: shards, their sample format, geometry, token labels, streaming.

Modules (import them directly; this package re-exports nothing, to keep imports light):
- `sample_format` — the ONE definition of a sample (members, mask encoding, meta.json).
- `manifest` — `manifest.json`: `read_manifest`, `shard_entries`, `shard_urls`, `verify_shards`.
- `shard_writer` — deterministic shard writing (`ShardWriter`, `write_shards`).
- `imagenet_s` — the ImageNet-S converter; `shapes` / `shapes_samples` — the embedded set.
- `geometry` — `EvalGeometry`: timm's eval resize/crop for images and masks alike.
- `token_labels` — the ONE token-label rule (METHOD §5).
- `shard_stream` — `iter_shard_samples`: one shard's raw samples, read once (sha256 while
  streaming); `ShardReadError` for a shard that does not read to its end or match its manifest.
- `reader` — `iter_shard_batches` / `iter_batches`: decoded batches, per shard, explicit lists;
  `loader.shard_batches` the same over DataLoader workers.
- `device_transform` — `[data] transform = "device"`: resize / crop / normalise (and nvJPEG) on the device.
- `class_names` — the ONE definition of the ImageNet-1k class names.
No models, no Ray.
"""
