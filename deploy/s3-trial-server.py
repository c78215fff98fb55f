"""The S3 API of deploy/compose.yaml's trial cluster: moto's server, in memory, with the bucket
the cluster uses (S3_BUCKET) created at start. Not for a class: nothing survives a restart."""

import os
import time

import boto3
from moto.server import ThreadedMotoServer

server = ThreadedMotoServer(ip_address="0.0.0.0", port=5000)
server.start()
# moto accepts any keys: the cluster's own (from deploy/.env) matter only to a real S3 service.
boto3.client(
    "s3",
    endpoint_url="http://127.0.0.1:5000",
    aws_access_key_id="trial",
    aws_secret_access_key="trial",
    region_name="us-east-1",
).create_bucket(Bucket=os.environ.get("S3_BUCKET", "sandbox"))
print("S3 API (moto, in memory) on :5000 with bucket", os.environ.get("S3_BUCKET", "sandbox"))
while True:
    time.sleep(3600)
