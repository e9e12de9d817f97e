from featprobe.cli import main

main(prog_name="featprobe")
