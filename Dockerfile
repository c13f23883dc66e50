# hf_graft on a CUDA PyTorch image: filter grafting with the Hugging Face Trainer and Accelerate.
#
#   docker build -t hf_graft .
#   docker run --rm --gpus all --shm-size 16g \
#       -v /data/imagenet:/data/imagenet:ro -v "$PWD/out:/workspace/out" \
#       hf_graft --config_file /opt/hf_graft/recipes/accelerate/1node_8gpu_bf16.yaml \
#       -m hf_graft.train /opt/hf_graft/recipes/imagenet_r50.yaml \
#       --dataset_name imagefolder --data_dir /data/imagenet --output_dir out/imagenet_r50
#
# The entry point is `accelerate launch`; everything after the image name is passed to it, so the
# default command (the offline quickstart, one process) is replaced by launch options followed by
# `-m hf_graft.train RECIPE.yaml [--field value ...]`.
# Pick another PyTorch/CUDA pairing with --build-arg BASE_IMAGE=pytorch/pytorch:<tag>.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface

WORKDIR /opt/hf_graft
COPY pyproject.toml README.md ./
COPY src ./src
COPY recipes ./recipes

# Keep the image's CUDA build of torch/torchvision: pin them while pip resolves the project's
# dependencies (timm, transformers, accelerate, datasets, ...), then check that the package imports
# and that its CIFAR architectures are registered in timm.
RUN python -c "import torch, torchvision; print(f'torch=={torch.__version__}'); print(f'torchvision=={torchvision.__version__}')" \
        > /tmp/torch-constraints.txt \
    && pip install -c /tmp/torch-constraints.txt ".[tensorboard]" \
    && python -c "import hf_graft, timm; assert timm.is_model('cifar_resnet20'); print('hf_graft', hf_graft.__version__)" \
    && rm /tmp/torch-constraints.txt

# Mount datasets (read-only) and an output folder; the Hub cache lives in /cache (mount it to keep it).
WORKDIR /workspace
VOLUME ["/cache"]

ENTRYPOINT ["accelerate", "launch"]
CMD ["-m", "hf_graft.train", "/opt/hf_graft/recipes/quickstart.yaml", "--output_dir", "out/quickstart"]
