"""Side-by-side benchmarks of runctl against s5cmd and aws-cli on a loopback rclone server (issue 6)."""
