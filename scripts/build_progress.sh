#!/bin/sh
# Filter of a verbose build log (pip install -v / setup.py build_ext) to one line per step, as they
# happen: setup.py's own lines, ninja's "[k/n]" compile steps (the source file named), the link, the
# compiler's errors and pip's result. Usage: pip install -v ... 2>&1 | tee build.log | scripts/build_progress.sh
# mawk (Debian's awk) reads its input in blocks unless told to read it line by line
interactive=""
if awk -W version 2>&1 | grep -q mawk; then interactive="-W interactive"; fi
# shellcheck disable=SC2086
exec awk $interactive '
BEGIN { srand(); t0 = srand() }  # srand() returns the previous seed: the time of the first call
function now() { srand(); return srand() - t0 }
/building .* extension/ { printf "  compiling the changed sources (ninja); a line as each is done (%d s)\n", now(); fflush(); next }
/deltal-kernels setup:/ { sub(/^[ \t]*/, ""); print "  " $0; fflush(); next }
/^[ \t]*\[[0-9]+\/[0-9]+\] / {
  match($0, /\[[0-9]+\/[0-9]+\]/); step = substr($0, RSTART, RLENGTH)
  src = ""; n = split($0, w, " ")
  for (i = 1; i < n; i++) if (w[i] == "-c") src = w[i + 1]
  sub(/.*\/csrc\//, "csrc/", src)
  tool = (src ~ /\.cu$/) ? "nvcc" : "c++"
  printf "  %s %s %s done (%d s)\n", step, tool, (src == "" ? "(object)" : src), now(); fflush(); next
}
/ -shared / && / -o / { n = split($0, w, " "); for (i = 1; i < n; i++) if (w[i] == "-o") out = w[i + 1]
  sub(/.*\//, "", out); printf "  link %s (%d s)\n", out, now(); fflush(); next }
/(error|Error)[: ]/ && !/-Werror|Werror=|error_prefix|errors\.h/ { print; fflush(); next }
/^Successfully installed|^ERROR:/ { print "  " $0; fflush() }
'
