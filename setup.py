"""Installs lclm's three Python packages: pallas_kernels, layers and lclm."""

import setuptools

INSTALL_REQUIRES = [
    # jax 0.11 dropped Python 3.11: 3.11 resolves to jax 0.10.x, 3.12+ to 0.12.x (0.11 works too).
    "jax>=0.10.0,<0.13",
    # nnx.capture (sown MoE auxiliary losses) arrived in 0.12.6.
    "flax>=0.12.6,<0.14",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.11.0,<0.13",
    "grain>=0.2.10,<0.3",
    "gin-config>=0.5.0,<0.6",
    # TFDS builders write array_record files that Grain reads; TensorFlow is not needed.
    "tensorflow-datasets>=4.9.8,<5",
    "numpy>=1.26,<3",
    "tqdm>=4.66,<5",
    # TensorBoard event files without TensorFlow.
    "tensorboardX>=2.6,<3",
    # Plots written by the experiments (length extrapolation).
    "matplotlib>=3.8,<4",
    # Hugging Face checkpoints and tokenizers, read without torch (lclm.hf, lclm.data).
    "safetensors>=0.4.3,<1",
    "tokenizers>=0.19,<1",
    "sentencepiece>=0.2,<0.3",
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest>=8.0,<10",
        "pytest-xdist>=3.5,<4",
        "hypothesis>=6.100,<7",
        # tests/training/test_remote_workdir.py fakes gs:// with fsspec's memory filesystem.
        "fsspec>=2024.2.0,<2027",
        # tests/notebooks executes every notebook with a Jupyter kernel.
        "nbclient>=0.10,<0.12",
        "nbformat>=5.10,<6",
        "ipykernel>=6.29,<8",
    ],
    # The peer of lclm.hf's parity tests (transformers on CPU). torch is pinned to the CPU
    # build that lies on the CI machines for Python 3.11; other Pythons skip those tests
    # rather than download a multi-GB CUDA build (install torch yourself to run them).
    "hf": [
        "transformers>=4.56,<6",
        "torch==2.13.0; python_version == '3.11'",
    ],
    # lm-evaluation-harness tasks on lclm models (lclm.evals.harness registers the model "lclm").
    "eval": [
        "lm-eval>=0.4.5,<0.5",
    ],
    "notebooks": [
        "jupyter>=1.0,<2",
    ],
    "gpu": ["jax[cuda12]>=0.10.0,<0.13"],
    "tpu": ["jax[tpu]>=0.10.0,<0.13"],
    # gs:// run directories. etils.epath (metrics, eval.json, configs, Orbax's metadata)
    # reaches GCS through fsspec's gcsfs; Orbax lists and deletes checkpoint steps of
    # gs:// paths with google-cloud-storage (its array data goes through tensorstore's own
    # GCS driver, built in). TensorBoard event files go through epath too
    # (lclm.training.metrics), so tensorboardX's google-cloud-storage writer is not used.
    "gcs": [
        "gcsfs>=2024.2.0,<2027",
        "google-cloud-storage>=2.18,<4",
    ],
}

setuptools.setup(
    name="lclm",
    version="0.1.0",
    description="Long-sequence model cores as Pallas kernels, Flax NNX layers and gin experiments.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["lclm*", "layers*", "pallas_kernels*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
