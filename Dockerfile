# The sandbox server's image: `sandbox-kernel serve` (a single server or a cluster's front) and
# `sandbox-kernel worker`, with bubblewrap isolating every command inside the container.
#
# Build it with deploy/build-image, which builds the wheel on the host first (the package is
# installed from that wheel, never from a checkout) and, with --debootstrap, a Debian base of its
# own where no registry can be reached. By hand:
#     python3 -m pip wheel -w build/image/wheels '.[cluster]'
#     docker build -t sandbox-kernel .
# The options a container needs to run it (seccomp profile, /proc unmasked, CAP_SYS_ADMIN for
# the entrypoint only) are in deploy/compose.yaml and README.md's "Deploying" section.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
# bubblewrap isolates the commands; libseccomp2 builds their seccomp filter; util-linux brings
# setpriv (the entrypoint drops CAP_SYS_ADMIN with it, the server drops to nobody with it).
# TOOLCHAINS: what the class's cells compile and run with, beside bash and python3.
ARG TOOLCHAINS="gcc libc6-dev make"
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        bubblewrap libseccomp2 util-linux procps ca-certificates python3 python3-venv \
        ${TOOLCHAINS} \
    && rm -rf /var/lib/apt/lists/*

COPY build/image/wheels/ /tmp/wheels/
RUN python3 -m venv /opt/sandbox-kernel \
    && /opt/sandbox-kernel/bin/pip install --no-cache-dir --disable-pip-version-check \
        --no-index --find-links /tmp/wheels "$(ls /tmp/wheels/sandbox_kernel-*.whl)[cluster]" \
    && rm -rf /tmp/wheels

COPY deploy/entrypoint.sh /usr/local/bin/sandbox-kernel-entrypoint
ENV PATH=/opt/sandbox-kernel/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Environments, the worker's cache and its working directories (a volume in compose).
VOLUME /var/lib/sandbox-kernel
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/sandbox-kernel-entrypoint"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/var/lib/sandbox-kernel", \
     "--token-file", "/var/lib/sandbox-kernel/token", "--no-advertise"]
