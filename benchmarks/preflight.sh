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

# What ran where: the date, cardinal's commit, torch and accelerate, each visible GPU (the head of a report).
# A copy of the tree without its git history (a remote machine's) names its commit in CARDINAL_COMMIT.
describe_environment() {
    echo "date: $(date '+%Y-%m-%d %H:%M:%S')"
    echo "cardinal: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "${CARDINAL_COMMIT:-unknown}")"
    "$PYTHON" -c 'import torch, accelerate
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), accelerate {accelerate.__version__}")
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i}: {torch.cuda.get_device_name(i)}")' 2>/dev/null
}
