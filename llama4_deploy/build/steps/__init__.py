"""The build's steps, one module each, run in this order by llama4_deploy/build/pipeline.py over one BuildContext:

    load       the checkpoint (or seeded random weights), checked; context, pipeline-stage split, quantization spec
    trace      each layer kind traced once into an ONNX template                              (cached)
    calibrate  FP8 activation ranges (cached) or AWQ scales, for the specs that need them
    dispatch   the MoE lowering of each engine role, priced by the cost model                  (cached)
    save       per pipeline stage: its graphs linked and lowered (lower.py), written with their weights  (cached)
    manifest   manifest.json, with the tokenizer files copied in
    golden     the engine's logits for a fixed prompt                                           (cached)
    hash       every file's size and SHA-256 into the manifest

`lower.py` is not a step of its own: it links and lowers one graph, for `dispatch` (to price a candidate) and `save`.
Cached steps are kept under a key of what they read (llama4_deploy/build/cache.py), so a rerun resumes.
"""
