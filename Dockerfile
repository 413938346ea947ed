# The GPU image of ministral-serve: Ray's CUDA image at the pinned Ray version,
# plus the pinned vLLM and this project, installed by scripts/install.sh gpu
# under constraints/gpu.txt (every transitive version fixed), in a venv that
# sees the base image's packages: its Ray is the pinned one and is not
# installed a second time.
#   docker build -t ministral-serve:0.1.0 .
# Pin the base by digest for a reproducible build (docs/kubernetes.md says how):
#   docker build --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu@sha256:... .
# The Helm chart (helm/ministral-serve) runs it as head and GPU workers.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu

FROM ${RAY_IMAGE} AS build
WORKDIR /home/ray/app
# The dependency set first, so that a source-only change reuses the install layer.
COPY --chown=ray:users pyproject.toml ./
COPY --chown=ray:users scripts/install.sh scripts/
COPY --chown=ray:users constraints/gpu.txt constraints/
COPY --chown=ray:users serve/__init__.py serve/
COPY --chown=ray:users deployments/__init__.py deployments/
COPY --chown=ray:users autoscaling/__init__.py autoscaling/
COPY --chown=ray:users dashboards/__init__.py dashboards/
COPY --chown=ray:users benchmarks/__init__.py benchmarks/
RUN PYTHON=python SYSTEM_SITE_PACKAGES=1 scripts/install.sh gpu
COPY --chown=ray:users . .

# Only the project and its virtual environment come over: no pip cache, no
# build leftovers. The base image's Python is the venv's interpreter.
FROM ${RAY_IMAGE}
WORKDIR /home/ray/app
COPY --from=build --chown=ray:users /home/ray/app /home/ray/app
ENV PATH=/home/ray/app/.venv/bin:$PATH \
    VIRTUAL_ENV=/home/ray/app/.venv \
    PYTHONPATH=/home/ray/app
# ray (uid 1000, group users 100) of the base image: not root.
USER 1000:100
EXPOSE 8000 8080 8265
CMD ["ministral-serve", "--help"]
