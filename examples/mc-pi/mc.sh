#!/bin/sh
# Toy Monte Carlo: estimate pi by throwing SAMPLES random points into the unit square and counting
# those inside the quarter circle. Also histograms the points' distance from the origin.
# POSIX sh + awk only (the volunteer VM carries busybox).
#
# Environment: SAMPLES (default 100000), BINS (default 20), SEED (default: COPILOT_INSTANCE, else 1).
# Writes: result.txt (key = value lines), histogram.csv (lo,hi,count; bins over 0..sqrt(2)).
set -eu

samples=${SAMPLES:-100000}
bins=${BINS:-20}
seed=${SEED:-${COPILOT_INSTANCE:-1}}

case $samples$bins$seed in
*[!0-9]*) echo "SAMPLES, BINS and SEED must be non-negative integers" >&2; exit 2 ;;
esac

echo "mc-pi: $samples samples, seed $seed" >&2

awk -v n="$samples" -v bins="$bins" -v seed="$seed" 'BEGIN {
    srand(seed + 1)
    rmax = sqrt(2)
    inside = 0
    for (b = 0; b < bins; b++) count[b] = 0
    for (i = 0; i < n; i++) {
        x = rand(); y = rand()
        r2 = x * x + y * y
        if (r2 <= 1) inside++
        b = int(sqrt(r2) / rmax * bins)
        if (b >= bins) b = bins - 1
        count[b]++
    }
    pi = (n > 0) ? 4 * inside / n : 0
    printf "seed = %d\nsamples = %d\ninside = %d\npi = %.6f\n", seed, n, inside, pi > "result.txt"
    print "lo,hi,count" > "histogram.csv"
    for (b = 0; b < bins; b++)
        printf "%.6f,%.6f,%d\n", b * rmax / bins, (b + 1) * rmax / bins, count[b] > "histogram.csv"
    printf "pi ~ %.6f\n", pi
}'
