# Stand-in for python:3.11-slim-bookworm, built from Debian's own packages (Docker Hub is out of
# reach here). Only what docker/Dockerfile.* use: `python` with venv and pip, useradd, CA roots.
FROM hmt-standin/debian:bookworm
LABEL org.hmt-serve.standin="python"
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python-is-python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# The host's trust store, and pip pointed at it: where a TLS-inspecting proxy stands between this
# machine and PyPI, its CA is in the host's bundle (pip's own bundle would refuse the proxy).
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY pip.conf /etc/pip.conf
CMD ["python3"]
