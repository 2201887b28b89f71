# Sourced by gpu_check.sh (tests stage) and gpu_check_lu.sh: `pytest_workers N` prints the pytest options for N
# pytest-xdist workers where xdist loads -- installed (entry point), or carried on PYTHONPATH (no entry point:
# loaded with -p, which an installed xdist would reject as registered twice) -- and nothing (serial) otherwise or
# for N <= 1. Uses $PY.
pytest_workers() {
    local n=$1 probe=(--co -q tests/test_images.py)
    (( n > 1 )) || return 0
    if ${PY:-python3} -m pytest -n 2 "${probe[@]}" > /dev/null 2>&1; then
        echo "-n $n"
    elif ${PY:-python3} -m pytest -p xdist.plugin -n 2 "${probe[@]}" > /dev/null 2>&1; then
        echo "-p xdist.plugin -n $n"
    fi
}
