package main

import (
	"bufio"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"

	"github.com/tetherlb/tether/config"
)

// docFiles are the pages whose examples TestDocExamples checks: the README
// and every page under docs/ (the generated benchmark reports aside).
func docFiles(t *testing.T) []string {
	t.Helper()
	files := []string{"../../README.md"}
	err := filepath.WalkDir("../../docs", func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == "bench" {
			return filepath.SkipDir
		}
		if strings.HasSuffix(path, ".md") {
			files = append(files, path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// block is a fenced code block of a Markdown page.
type block struct {
	lang string
	line int // of its first line of code
	text string
}

func codeBlocks(t *testing.T, path string) []block {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var (
		out  []block
		cur  *block
		body strings.Builder
	)
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		trimmed := strings.TrimSpace(line)
		switch {
		case cur == nil && strings.HasPrefix(trimmed, "```"):
			cur = &block{lang: strings.Fields(strings.TrimPrefix(trimmed, "```") + " -")[0], line: n + 1}
			body.Reset()
		case cur != nil && trimmed == "```":
			cur.text = body.String()
			out = append(out, *cur)
			cur = nil
		case cur != nil:
			body.WriteString(line + "\n")
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if cur != nil {
		t.Fatalf("%s:%d: code block never closed", path, cur.line)
	}
	return out
}

// TestDocExamples keeps the documentation's examples true:
//
//   - every yaml block is a whole configuration that tether accepts;
//   - every tether command line of a sh block names commands that exist,
//     with flags those commands (or tether itself) take, and its command's
//     --help works.
func TestDocExamples(t *testing.T) {
	yamls, commands := 0, 0
	for _, path := range docFiles(t) {
		name := strings.TrimPrefix(path, "../../")
		for _, b := range codeBlocks(t, path) {
			switch b.lang {
			case "yaml":
				yamls++
				if _, err := config.Parse([]byte(b.text)); err != nil {
					t.Errorf("%s:%d: the configuration example is refused: %v", name, b.line, err)
				}
			case "sh":
				for i, line := range strings.Split(b.text, "\n") {
					words := commandWords(line)
					if words == nil {
						continue
					}
					commands++
					if err := checkCommand(words); err != "" {
						t.Errorf("%s:%d: %q: %s", name, b.line+i, strings.TrimSpace(line), err)
					}
				}
			}
		}
	}
	t.Logf("%d configuration examples parse, %d command lines name real commands and flags", yamls, commands)
	if yamls == 0 || commands == 0 {
		t.Errorf("found %d configuration examples and %d command lines: the pages moved?", yamls, commands)
	}
}

// commandWords returns the words after "tether" of a shell line that runs
// it (also after sudo), up to a comment, a pipe or a redirection; nil for
// other lines.
func commandWords(line string) []string {
	if i := strings.Index(line, "#"); i >= 0 {
		line = line[:i]
	}
	words := strings.Fields(line)
	if len(words) > 0 && words[0] == "sudo" {
		words = words[1:]
	}
	if len(words) == 0 || words[0] != "tether" {
		return nil
	}
	words = words[1:]
	for i, w := range words {
		if w == "|" || w == "&&" || w == ";" || strings.HasPrefix(w, ">") || strings.HasPrefix(w, "<") {
			return words[:i]
		}
	}
	return words
}

// checkCommand walks words down tether's commands and checks each flag;
// it returns what is wrong, or "".
func checkCommand(words []string) string {
	app := newApp()
	cmds, flags := app.Commands, app.Flags
	var path []string
	var cmd *cli.Command
	for i := 0; i < len(words); i++ {
		w := words[i]
		if strings.HasPrefix(w, "-") {
			name, _, hasValue := strings.Cut(strings.TrimLeft(w, "-"), "=")
			f := findFlag(append(slices.Clone(flags), app.Flags...), name)
			if f == nil {
				return "no flag --" + name + " for tether " + strings.Join(path, " ")
			}
			if !hasValue && takesValue(f) {
				i++ // its value
			}
			continue
		}
		if cmd != nil && len(cmd.Subcommands) == 0 {
			continue // an argument
		}
		var next *cli.Command
		for _, c := range cmds {
			if c.HasName(w) {
				next = c
			}
		}
		if next == nil {
			if cmd == nil {
				return "no command " + w
			}
			return "no subcommand " + w + " of tether " + strings.Join(path, " ")
		}
		cmd, cmds, flags = next, next.Subcommands, next.Flags
		path = append(path, w)
	}
	if cmd == nil {
		return ""
	}
	if _, errOut, code := run(append(path, "--help")...); code != 0 {
		return "tether " + strings.Join(path, " ") + " --help failed: " + errOut
	}
	return ""
}

func findFlag(flags []cli.Flag, name string) cli.Flag {
	if name == "help" || name == "h" {
		return cli.HelpFlag
	}
	for _, f := range flags {
		if slices.Contains(f.Names(), name) {
			return f
		}
	}
	return nil
}

func takesValue(f cli.Flag) bool {
	if d, ok := f.(cli.DocGenerationFlag); ok {
		return d.TakesValue()
	}
	return false
}
