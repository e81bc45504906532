"""llama.cpp's own converter (convert_hf_to_gguf.py of the llama-cpp-python source tree `make bench-peers` builds)
on the bench's checkpoint, run by this project's venv (the converter needs torch and transformers; the peers venv has
neither). One change: the bench's tokenizer is a small byte-level BPE of its own, whose pre-tokenizer hash the
converter's table of known models does not list; the bench feeds token ids, never text, so it is named llama4's.

    python -m tools.peers_convert LLAMA_CPP_DIR CHECKPOINT_DIR OUT.gguf
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main() -> None:
    llama_cpp, checkpoint, out = (Path(arg) for arg in sys.argv[1:4])
    sys.path[:0] = [str(llama_cpp), str(llama_cpp / "gguf-py")]
    from conversion import base  # the converter's package, from llama_cpp

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "llama4"
    script = llama_cpp / "convert_hf_to_gguf.py"
    sys.argv = [str(script), str(checkpoint), "--outfile", str(out), "--outtype", "f32"]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
