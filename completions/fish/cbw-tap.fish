# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_cbw_tap_global_optspecs
    string join \n h/help V/version
end

function __fish_cbw_tap_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_cbw_tap_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_cbw_tap_using_subcommand
    set -l cmd (__fish_cbw_tap_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c cbw-tap -n "__fish_cbw_tap_needs_command" -s h -l help -d 'Print help'
complete -c cbw-tap -n "__fish_cbw_tap_needs_command" -s V -l version -d 'Print version'
complete -c cbw-tap -n "__fish_cbw_tap_needs_command" -f -a "serve" -d 'Serve images as NBD exports until SIGINT/SIGTERM/SIGHUP'
complete -c cbw-tap -n "__fish_cbw_tap_needs_command" -f -a "backup" -d 'Back up every export of a running server, at one instant, as a cluster stream on stdout (e.g. `| vma-encode - > vm.vma`)'
complete -c cbw-tap -n "__fish_cbw_tap_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand serve" -l socket -d 'NBD Unix socket to create (mode 0600)' -r -F
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand serve" -l control -d 'Control socket for `cbw-tap backup` (mode 0600) [default: PATH.ctl]' -r -F
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand serve" -l tcp -d 'Also serve NBD over TCP on this address, e.g. 127.0.0.1:10809 (no TLS, no authentication)' -r
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand serve" -l state-dir -d 'Keep the changed-cluster tracking across restarts: saved to DIR/cbw-tap.state on a clean shutdown, read (and removed) at start. Without it, or after an unclean stop, the next `backup --incremental` is full' -r -F
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand serve" -l assume-raw -d 'Serve images that start like qcow2, VMDK, VHDX, VDI, QED or VHD as raw disks all the same (a guest may write such bytes to its own disk\'s first sector; without this the next serve refuses it)'
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand serve" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand backup" -l control -d 'The server\'s control socket' -r -F
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand backup" -l buffer -d 'Captured clusters that may wait for the consumer, e.g. 64M (the background reader fills at most three quarters: the rest is kept for copies before guest writes)' -r
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand backup" -l bwlimit -d 'Limit the background reader to SIZE bytes per second, e.g. 200M (copy-before-write is never limited)' -r
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand backup" -l cpus -d 'Run the backup\'s own work on these CPUs only (`taskset -c` list, e.g. 1 or 0,2-3): the server\'s background reader and stream writer, and CONSUMER; guest I/O keeps the other CPUs. A consumer in a pipe: `taskset -c LIST vma-encode -`' -r
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand backup" -l fleecing -d 'Fleecing: when the buffer is full, copy-before-write puts old clusters into FILE (created, mode 0600, removed at the end; must not exist) instead of making the guest wait' -r -F
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand backup" -l cbw-timeout -d 'How long a guest write may wait for its copy when the buffer is full; also how long the consumer may stall' -r
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand backup" -l on-cbw-error -d 'What to do when a copy before a guest write fails or times out' -r -f -a "break-snapshot\t'Abort the backup, let the guest write through'
break-guest-write\t'Fail the guest write with EIO, keep the backup'"
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand backup" -l pre -d 'Shell command run before the instant (e.g. freeze file systems)' -r
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand backup" -l post -d 'Shell command run right after the instant (e.g. thaw)' -r
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand backup" -l uuid-from -d 'Archive uuid derived from NAME (the same for every backup made with it), instead of a random one; give vma-encode no --uuid' -r
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand backup" -l json -d 'Print the final status and counters as one JSON object on stderr'
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand backup" -s v -l verbose -d 'Print Proxmox-style progress lines on stderr (`progress N% TRANSFERRED/TOTAL ZEROS`, as `vma create -v`)'
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand backup" -l incremental -d 'Only the clusters written since the last completed backup (full if there is none); `vma-encode --base LAST.vma -` completes it'
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand backup" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand help; and not __fish_seen_subcommand_from serve backup help" -f -a "serve" -d 'Serve images as NBD exports until SIGINT/SIGTERM/SIGHUP'
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand help; and not __fish_seen_subcommand_from serve backup help" -f -a "backup" -d 'Back up every export of a running server, at one instant, as a cluster stream on stdout (e.g. `| vma-encode - > vm.vma`)'
complete -c cbw-tap -n "__fish_cbw_tap_using_subcommand help; and not __fish_seen_subcommand_from serve backup help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
