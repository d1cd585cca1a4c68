cd /work/main
for w in mfeat MOSI-shaped; do for m in plain modalimmune; do
  c=$(mktemp -d)
  for a in cold warm; do
    r=$(JAX_COMPILATION_CACHE_DIR=$c JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 python experiments/bench_methods.py --first-step "$w:$m" 2>/dev/null | tail -1)
    echo "$w $m $a $r"
  done; rm -rf $c
done; done
