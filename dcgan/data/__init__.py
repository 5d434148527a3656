"""Images in: shard sets and their identity, the streaming reader, the device-resident cache, augmentation, and writing shards."""
