# Sourced by the GPU scripts (set SCRIPT, the name their lines start with, and PYTHON first): what stops
# a script before it starts anything is one line on stderr and exit code 2.

refuse() {
    echo "$SCRIPT: $*" >&2
    exit 2
}

# The number of CUDA devices torch sees. In a command substitution a refusal ends only the subshell, so
# call it as GPUS=$(visible_gpus) || exit 2.
visible_gpus() {
    command -v timeout >/dev/null || refuse "the 'timeout' command (coreutils) is missing"
    local gpus
    gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' \
        2>/dev/null | tail -n 1)
    [[ "$gpus" =~ ^[0-9]+$ ]] || refuse "cannot import torch with '$PYTHON'; activate the environment cardinal is installed in"
    echo "$gpus"
}

# Create the output folder, refusing one that already holds files: a run folder there would be refused
# run by run (cardinal never starts over a run), and older results would mix with new ones.
fresh_folder() {
    [ -z "$(ls -A "$1" 2>/dev/null)" ] || refuse "$1 is not empty: pass a new output folder"
    mkdir -p "$1" 2>/dev/null || refuse "cannot create output folder $1"
}
