# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_vma_decode_global_optspecs
    string join \n h/help V/version
end

function __fish_vma_decode_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_vma_decode_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_vma_decode_using_subcommand
    set -l cmd (__fish_vma_decode_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c vma-decode -n "__fish_vma_decode_needs_command" -s h -l help -d 'Print help'
complete -c vma-decode -n "__fish_vma_decode_needs_command" -s V -l version -d 'Print version'
complete -c vma-decode -n "__fish_vma_decode_needs_command" -f -a "serve" -d 'Serve every device read-only over NBD, straight from the archive (no extract)'
complete -c vma-decode -n "__fish_vma_decode_needs_command" -f -a "list" -d 'Print the configs, devices and creation time, exactly as Proxmox\'s `vma list`'
complete -c vma-decode -n "__fish_vma_decode_needs_command" -f -a "config" -d 'Print one config file, like `vma config`'
complete -c vma-decode -n "__fish_vma_decode_needs_command" -f -a "extract" -d 'Write each device as DIR/disk-<name>.raw (sparse), vmstate as DIR/vmstate.bin, and the config files; or restore onto the targets of a map (-r); or one disk to stdout (--stdout)'
complete -c vma-decode -n "__fish_vma_decode_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c vma-decode -n "__fish_vma_decode_using_subcommand serve" -l socket -d 'NBD Unix socket to create (mode 0600)' -r -F
complete -c vma-decode -n "__fish_vma_decode_using_subcommand serve" -l tcp -d 'Also serve over TCP on this address, e.g. 127.0.0.1:10809 (no TLS, no authentication)' -r
complete -c vma-decode -n "__fish_vma_decode_using_subcommand serve" -l cache -d 'Directory to decompress a compressed archive (or copy one from a pipe) into' -r -F
complete -c vma-decode -n "__fish_vma_decode_using_subcommand serve" -l save-index -d 'Save the index beside a plain archive, as ARCHIVE.vmaidx'
complete -c vma-decode -n "__fish_vma_decode_using_subcommand serve" -l no-space-check -d 'Start even if --cache DIR has less room than the archive\'s devices need'
complete -c vma-decode -n "__fish_vma_decode_using_subcommand serve" -s h -l help -d 'Print help'
complete -c vma-decode -n "__fish_vma_decode_using_subcommand list" -l json -d 'Print one JSON object instead (uuid, ctime, configs, devices: docs/JSON.md)'
complete -c vma-decode -n "__fish_vma_decode_using_subcommand list" -s h -l help -d 'Print help'
complete -c vma-decode -n "__fish_vma_decode_using_subcommand config" -s c -l config -d 'The config\'s name' -r
complete -c vma-decode -n "__fish_vma_decode_using_subcommand config" -s h -l help -d 'Print help'
complete -c vma-decode -n "__fish_vma_decode_using_subcommand extract" -s d -l devices -d 'Only these devices (comma-separated names, e.g. drive-scsi0,drive-virtio1)' -r
complete -c vma-decode -n "__fish_vma_decode_using_subcommand extract" -s r -l map -d 'Restore onto the targets named in MAPFILE (usually a FIFO), as Proxmox\'s qmrestore does' -r -F
complete -c vma-decode -n "__fish_vma_decode_using_subcommand extract" -l stdout -d 'Write device DEVNAME as a raw image to standard output, in order' -r
complete -c vma-decode -n "__fish_vma_decode_using_subcommand extract" -l reorder-buffer -d 'With --stdout: bytes of out-of-order clusters kept in memory before spilling to $TMPDIR' -r
complete -c vma-decode -n "__fish_vma_decode_using_subcommand extract" -s v -l verbose -d 'Print Proxmox-style progress and statistics'
complete -c vma-decode -n "__fish_vma_decode_using_subcommand extract" -l salvage -d 'Recover what a damaged or truncated archive still holds; exit 4 if anything is missing'
complete -c vma-decode -n "__fish_vma_decode_using_subcommand extract" -l force -d 'Write into an existing non-empty directory (replacing files of the same names)'
complete -c vma-decode -n "__fish_vma_decode_using_subcommand extract" -l json -d 'Print one JSON object on stdout at the end: the files written, their sizes, and the read\'s statistics (docs/JSON.md)'
complete -c vma-decode -n "__fish_vma_decode_using_subcommand extract" -s h -l help -d 'Print help'
complete -c vma-decode -n "__fish_vma_decode_using_subcommand help; and not __fish_seen_subcommand_from serve list config extract help" -f -a "serve" -d 'Serve every device read-only over NBD, straight from the archive (no extract)'
complete -c vma-decode -n "__fish_vma_decode_using_subcommand help; and not __fish_seen_subcommand_from serve list config extract help" -f -a "list" -d 'Print the configs, devices and creation time, exactly as Proxmox\'s `vma list`'
complete -c vma-decode -n "__fish_vma_decode_using_subcommand help; and not __fish_seen_subcommand_from serve list config extract help" -f -a "config" -d 'Print one config file, like `vma config`'
complete -c vma-decode -n "__fish_vma_decode_using_subcommand help; and not __fish_seen_subcommand_from serve list config extract help" -f -a "extract" -d 'Write each device as DIR/disk-<name>.raw (sparse), vmstate as DIR/vmstate.bin, and the config files; or restore onto the targets of a map (-r); or one disk to stdout (--stdout)'
complete -c vma-decode -n "__fish_vma_decode_using_subcommand help; and not __fish_seen_subcommand_from serve list config extract help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
