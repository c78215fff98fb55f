"""The sandbox cluster (issue 14): fronts and workers on a task engine, environments in S3.

A cluster runs ``execute/`` on workers that take jobs from a task engine on Redis, and keeps
saved environments in S3-API object storage (AWS S3, MinIO, Ceph RGW, Garage), so that any
worker can run a session's next cell and nothing is lost when a machine dies. The design is in
``docs/design/issue-14-cluster.md`` (part B).

Built so far: the content-addressed environment store (B5):

- :mod:`.objects`: :class:`~.objects.ObjectStore`, blobs by sha256 and immutable manifests in
  a bucket, over boto3, with errors worded for the person running the cluster;
- :mod:`.manifests`: the manifest format 1, built from a saved environment directory, published
  (only missing blobs are uploaded), and materialised back into a directory from an untrusted
  manifest, by descriptor, never following a link.

**Lazy imports.** ``boto3`` (about 100 ms to import), ``redis`` and ``celery`` are imported only
by the modules of this package, and nothing in :mod:`sandbox_kernel.server` imports this
package at module level: the single ``sandbox-kernel serve``, which every kernel starts, must
not pay for the cluster. This file itself imports nothing.
"""
