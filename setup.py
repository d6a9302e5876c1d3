from setuptools import setup

# `omni2` is an implicit namespace package: each sub-package lives in its own top-level folder. engine/ holds one
# sub-package per part (docs/ARCHITECTURE.md, "Packages").
ENGINE_PACKAGES = ("checkpoints", "cli", "client", "runtime", "serve", "wire")

setup(
    name="omni2-engine",
    version="0.1.0",
    description="Multi-process streaming inference engine for LLaMA-Omni2 speech-to-speech models",
    python_requires=">=3.10",
    packages=["omni2.engine", *(f"omni2.engine.{p}" for p in ENGINE_PACKAGES), "omni2.stages", "omni2.kernels"],
    package_dir={"omni2.engine": "engine", "omni2.stages": "stages", "omni2.kernels": "kernels"},
    package_data={"omni2.engine.serve": ["demo/*.html", "demo/*.js"]},  # the --demo page, served as is
    install_requires=[
        # torch is installed (or kept) by `make install` before this package: an unpinned requirement
        # here would let pip pull a multi-GB CUDA build on a CPU machine.
        "torch>=2.3",
        "transformers>=4.43",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pyzmq>=25",
        "msgpack>=1.0",
        "soxr>=0.3",
        "soundfile>=0.12",
        "tqdm>=4.60",
        "pyyaml>=5.4",  # cosyvoice.yaml, read as data (engine/checkpoints/hyperyaml.py)
    ],
    extras_require={
        # onnx builds the tiny random campplus.onnx; with onnxruntime + kaldi-native-fbank, tests enrol voices;
        # triton runs the kernels' tests on CPU in its interpreter (TRITON_INTERPRET=1; tested with 3.9.0). At
        # runtime triton is optional: without it every kernel falls back to its torch reference.
        "test": ["pytest>=7", "pytest-xdist>=3", "ruff>=0.4", "onnx>=1.14", "onnxruntime>=1.16",
                 "kaldi-native-fbank>=1.18", "triton>=3.0",
                 # the Realtime endpoint's tests: the official SDK drives it, Playwright drives the demo page in
                 # Debian's chromium (make install installs it where apt-get can run)
                 "openai[realtime]>=2.0", "playwright>=1.40"],
        "voice": ["onnxruntime>=1.16", "kaldi-native-fbank>=1.18"],  # enrol a voice from a wav (campplus.onnx)
        "bench": ["matplotlib>=3.7"],
        "audio": ["sounddevice>=0.4"],
        # serve --realtime: the WebSocket server, and server VAD (Silero's ONNX graph, run by onnxruntime)
        "realtime": ["websockets>=13", "onnxruntime>=1.16", "silero-vad>=5.1"],
    },
    entry_points={"console_scripts": ["omni2-engine = omni2.engine.cli.main:main"]},
)
