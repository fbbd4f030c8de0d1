"""The data layer: shards, their sample format, geometry, token labels, streaming.

Modules (import them directly; this package re-exports nothing, to keep imports light):
- `sample_format` — the ONE definition of a sample (members, mask encoding, meta.json).
- `manifest` — `manifest.json`: `read_manifest`, `shard_urls`, `verify_shards`.
- `shard_writer` — deterministic shard writing (`ShardWriter`, `write_shards`).
- `imagenet_s` — the ImageNet-S converter; `shapes` / `shapes_samples` — the embedded set.
- `geometry` — `EvalGeometry`: timm's eval resize/crop for images and masks alike.
- `token_labels` — the ONE token-label rule (METHOD §5).
- `reader` — `iter_shard_batches` / `iter_batches`: streaming, per shard, explicit lists.
No models, no Ray.
"""
