# Reads a `cargo test` log and prints what failed, for the end of a long CI log:
# - each failed test's name and panic message;
# - each hung test the watchdog (recpipe_shared::testkit::watch_this_test) aborted, with
#   a digest of gdb's stacks: per thread, its name and the frames in the project's code
#   or in (rd)kafka, where a blocked thread shows what it waits on;
# - each test binary that did not exit cleanly (a signal, an abort), and cargo's closing
#   list of failed targets.

# A gdb frame, shortened to "#N function at file:line".
function frame(line,    f, at, n) {
  f = line
  sub(/^#[0-9]+ +(0x[0-9a-f]+ in )?/, "", f)
  at = ""
  if (match(f, / at [^ ]+:[0-9]+$/)) {
    at = substr(f, RSTART)
    f = substr(f, 1, RSTART - 1)
  }
  sub(/ \(.*$/, "", f)
  if (length(f) > 90) f = substr(f, 1, 90) "..."
  split(line, n, " ")
  return n[1] " " f at
}

/^---- .* stdout ----$/ { name = $2; failed = 1 }
/^failures:$|^test result:/ { failed = 0 }
failed && /panicked at/ { print "\n" name ": " $0; left = 12; next }
left > 0 { if ($0 ~ /^note: / || $0 == "") { left = 0 } else { print; left--; next } }

/ is still running after [0-9]+ s: it hangs/ {
  print "\n" $0
  hung = 1; shown = 0; next
}
hung && /^\(no stacks: / { print "  " $0; next }
hung && /^Thread [0-9]+ / {
  thread = $0
  sub(/^Thread [0-9]+ \(Thread 0x[0-9a-f]+ \(LWP [0-9]+\) /, "", thread)
  sub(/\):$/, "", thread)
  # The watchdogs and the metrics thread only ever wait; librdkafka's own threads
  # (rdk:*) serve its queues and sockets whatever the callers wait on.
  quiet = (thread ~ /test-watchdog|metrics-upkeep|^"rdk:/)
  header = 0; frames = 0; next
}
hung && /^#[0-9]+ / && !quiet && frames < 6 && shown < 120 \
    && (/^#0 / || / at ((shared|services|loadtest|e2e|trainer|vendor)\/[^ ]*|rd[a-z_]*\.c):[0-9]+$/) {
  if (!header) { print "  thread " thread ":"; header = 1; shown++ }
  print "    " frame($0); frames++; shown++
  next
}
/process didn't exit successfully/ { hung = 0; print "\n" $0; next }
/^error: .*target.* failed/ { hung = 0; tail = 1 }
tail { print }
