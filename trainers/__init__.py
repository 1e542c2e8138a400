"""Training: Lightning modules, data modules, callbacks and the ``anygen fit | validate | test | export`` commands.

- ``image_tokenizer`` / ``video_tokenizer``: ``ImageTokenizerModule``, ``VideoTokenizerModule`` (VQGAN-style
  reconstruction + optional PatchGAN / LPIPS; the video one trains on images and clips together).
- ``unified``: ``UnifiedModule``, next-token training of ``AnyGenModel`` with routed per-modality losses,
  structural targets masked, and staged (Janus-style) freezing.
- ``losses``: PatchGAN discriminator, hinge loss, VQGAN adaptive weight, LPIPS from local weights.
- ``data``: ``ImageDataModule``, ``VideoDataModule``, ``TokenDataModule``.
- ``callbacks``: ``SampleLogger`` (generations / reconstructions during training).
- ``cli``: ``LightningCLI`` entry points; YAMLs live in ``configs/``. ``export``: checkpoint -> loadable files.

Nothing is imported here, so ``import trainers.cli`` stays as light as Lightning allows.
"""
