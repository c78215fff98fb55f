# The services deploy/compose.yaml runs beside the sandbox: built from the same Debian base as
# the server's image (deploy/build-image builds each target), so that nothing is pulled from a
# registry. In production, point the cluster at your own Redis and S3 instead (README.md,
# "Deploying").
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS redis
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/*
USER redis
EXPOSE 6379
# The password comes from the environment (compose's .env): never a default.
CMD ["sh", "-c", "exec redis-server --bind 0.0.0.0 --protected-mode yes --save '' --appendonly no --requirepass \"${REDIS_PASSWORD:?set REDIS_PASSWORD}\""]

FROM ${BASE} AS s3
# moto's S3 API: in memory, for trying the cluster on one host; restarting it loses every
# saved environment. A class needs MinIO, Garage, Ceph RGW or AWS S3 (README.md).
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/moto
# The wheels are built on the host by deploy/build-image, which stages them and
# s3-trial-server.py in build/image/services (this file's build context).
COPY wheels/ /tmp/wheels/
RUN /opt/moto/bin/pip install --no-cache-dir --disable-pip-version-check --no-index \
        --find-links /tmp/wheels "moto[s3]>=5" flask flask-cors \
    && rm -rf /tmp/wheels
COPY s3-trial-server.py /opt/moto/
USER nobody
EXPOSE 5000
CMD ["/opt/moto/bin/python", "-u", "/opt/moto/s3-trial-server.py"]

FROM ${BASE} AS haproxy
RUN apt-get update && apt-get install -y --no-install-recommends haproxy \
    && rm -rf /var/lib/apt/lists/*
USER haproxy
EXPOSE 8080
CMD ["haproxy", "-W", "-db", "-f", "/etc/haproxy/sandbox.cfg"]
