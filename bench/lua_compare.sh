#!/usr/bin/env bash
# The former name of bench/nginx_compare.sh, kept for the commands that use it: the same
# script with the modes it measured then (static, resty.dynup, the article's approach)
# as the default. See nginx_compare.sh for the arguments and the environment.
MODES=${MODES:-static dynup article} exec bash "$(dirname "${BASH_SOURCE[0]}")/nginx_compare.sh" "$@"
