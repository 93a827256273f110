package main

import (
	"fmt"
	"io"

	"github.com/urfave/cli/v2"
)

var completionCommand = &cli.Command{
	Name:      "completion",
	Usage:     "print a shell completion script for bash or zsh",
	ArgsUsage: "bash|zsh",
	Description: `completion prints a script that completes tether's commands and flags; the
script asks tether itself (tether ... --generate-bash-completion).

    bash: tether completion bash > /etc/bash_completion.d/tether
    zsh:  tether completion zsh > "${fpath[1]}/_tether"`,
	Action: func(c *cli.Context) error {
		a, done, err := args(c, 1, 1, "a shell: bash or zsh")
		if done || err != nil {
			return err
		}
		return completion(c.App.Writer, a[0])
	},
}

// completion prints the completion script of shell.
func completion(w io.Writer, shell string) error {
	switch shell {
	case "bash":
		_, err := io.WriteString(w, bashCompletion)
		return err
	case "zsh":
		_, err := io.WriteString(w, zshCompletion)
		return err
	}
	return usagef("completion: %q is not bash or zsh", shell)
}

// bashCompletion completes with the words tether prints when given
// --generate-bash-completion after the words typed so far.
var bashCompletion = fmt.Sprintf(`# bash completion for tether; load with: source <(tether completion bash)
_tether_complete() {
  local cur="${COMP_WORDS[COMP_CWORD]}"
  local words=("${COMP_WORDS[@]:0:COMP_CWORD}")
  local opts
  if [[ "$cur" == -* ]]; then
    opts=$("${words[@]}" "$cur" --generate-bash-completion 2>/dev/null)
  else
    opts=$("${words[@]}" --generate-bash-completion 2>/dev/null)
  fi
  COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}
complete -o bashdefault -o default -F _tether_complete %s
`, "tether")

// zshCompletion does the same for zsh.
var zshCompletion = `#compdef tether
# zsh completion for tether; load with: source <(tether completion zsh)
_tether() {
  local -a opts
  local cur=${words[-1]}
  if [[ "$cur" == -* ]]; then
    opts=("${(@f)$(${words[@]:0:#words[@]-1} ${cur} --generate-bash-completion 2>/dev/null)}")
  else
    opts=("${(@f)$(${words[@]:0:#words[@]-1} --generate-bash-completion 2>/dev/null)}")
  fi
  if [[ "${opts[1]}" != "" ]]; then
    _describe 'values' opts
  else
    _files
  fi
}
if [[ "$funcstack[1]" == "_tether" ]]; then
  _tether "$@"
else
  compdef _tether tether
fi
`
