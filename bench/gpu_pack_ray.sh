#!/usr/bin/env bash
# Packs Ray 2.60 (with Serve) for the lent GPU machine, whose image has no Ray: the fleet
# benchmark (`bash bench/gpu_run.sh fleet ...`) runs one engine replica per GPU under Ray Serve.
# Stage ../shared/gpu's vLLM parts first (part05 installs vLLM into /tmp/site), then these parts,
# each call right after the last: `run carry=[".gpu/rayNN"] command='bash .gpu/rayNN/stage.sh'`.
# Run from the project root. Output: .gpu/ray01 ... (git-ignored).
#
# Ray goes to its own folder, /tmp/site-ray (bench/gpu_run.sh puts it on PYTHONPATH after
# /tmp/site): `pip install --target --upgrade` into vLLM's folder would replace whole namespace
# packages (`google`, `opentelemetry`) with Ray's few modules and break both.
#
# Left out, to fit fewer 64 MiB calls: wheels the vLLM parts already install (../shared/gpu/
# requirements-device.txt; their pinned versions win), numpy (the image's, which torch uses),
# and what a Serve fleet never loads from Ray's wheel: the Java jar, the dashboard's web client
# (the stack runs without a dashboard) and RLlib.
set -euo pipefail
root="$(git rev-parse --show-toplevel)"
device_requirements="$root/../shared/gpu/requirements-device.txt"
cache="${LAMPS_GPU_RAY_WHEELS:-/tmp/lamps-gpu-ray-wheels}"
part_mb="${PART_MB:-45}"
python="${PYTHON:-$root/.venv/bin/python}"
ray_version="$("$python" -c 'import ray; print(ray.__version__)')"

if [ ! -f "$cache/.complete" ]; then
  rm -rf "$cache" && mkdir -p "$cache"
  "$python" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    -d "$cache" "ray[serve]==$ray_version" redis
  normalize() { tr 'A-Z-.' 'a-z__'; }
  skip="$(sed -e 's/[=<>].*//' "$device_requirements" | normalize) numpy"
  for whl in "$cache"/*.whl; do
    name="$(basename "$whl" | cut -d- -f1 | normalize)"
    for s in $skip; do [ "$name" = "$s" ] && rm -f "$whl" && break; done
  done
  zip -q -d "$cache"/ray-"$ray_version"-*.whl 'ray/jars/*' 'ray/dashboard/client/build/*' \
    'ray/rllib/*'
  touch "$cache/.complete"
fi

mkdir -p "$root/.git/info"
grep -qx '/.gpu/' "$root/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >> "$root/.git/info/exclude"
rm -rf "$root"/.gpu/ray[0-9]*
tmp=$(mktemp -d)
tar -C "$cache" -cf "$tmp/all.tar" $(cd "$cache" && ls *.whl)
split -b "${part_mb}m" -d -a 2 "$tmp/all.tar" "$tmp/piece."
n=$(ls "$tmp"/piece.* | wc -l)
i=0
for p in "$tmp"/piece.*; do
  i=$((i+1)); d=$(printf "%s/.gpu/ray%02d" "$root" "$i"); mkdir -p "$d"; mv "$p" "$d/"
  cat > "$d/stage.sh" <<STAGE
#!/usr/bin/env bash
# Ray part $i of $n: keep this piece; the last part installs Ray into /tmp/site-ray.
set -e
mkdir -p /tmp/lamps-ray-stage && cp "\$(dirname "\$0")"/piece.* /tmp/lamps-ray-stage/
have=\$(ls /tmp/lamps-ray-stage/piece.* | wc -l)
echo "staged Ray piece $i of $n (\$have on the machine)"
if [ "\$have" -eq $n ]; then
  mkdir -p /tmp/lamps-ray-wheels /tmp/site-ray
  cat /tmp/lamps-ray-stage/piece.* | tar -C /tmp/lamps-ray-wheels -xf -
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \\
    --target /tmp/site-ray /tmp/lamps-ray-wheels/*.whl
  # Ray must see the GPUs, or the replicas (num_gpus: 1) would wait for them until the deploy
  # timeout: say so now, in seconds, not after a 10-minute call.
  PYTHONPATH=/tmp/site:/tmp/site-ray python3 -c "import ray, ray.serve, vllm; \\
print('ray', ray.__version__, 'vllm', vllm.__version__); \\
ray.init(include_dashboard=False, _node_ip_address='127.0.0.2', logging_level='ERROR'); \\
print('ray sees', ray.cluster_resources().get('GPU', 0), 'GPUs'); ray.shutdown()"
fi
STAGE
  chmod +x "$d/stage.sh"
done
rm -rf "$tmp"
echo "packed $n Ray parts under .gpu/ ($(du -sch "$root"/.gpu/ray[0-9]* | tail -1 | cut -f1))"
