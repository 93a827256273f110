// Package chart draws the results of the load balancer comparison as a PNG
// of small horizontal bar charts, one bar per balancer, for the README,
// with gonum.org/v1/plot.
//
// The output depends only on the input: the same heading, panels and width
// always give the same bytes, so tests can compare images.
package chart

import (
	"bytes"
	"errors"
	"fmt"
	"image/color"
	"math"
	"strconv"
	"strings"

	xfont "golang.org/x/image/font"
	"gonum.org/v1/plot"
	"gonum.org/v1/plot/font"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/text"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// A Panel is one small horizontal bar chart: one bar per balancer.
type Panel struct {
	Title    string  // e.g. "WebSocket connections/s (ratio to direct)"
	Unit     string  // printed after each value, e.g. "x" or " Mpps"
	Bars     []Bar   // one per balancer, drawn top to bottom
	Ref      float64 // if > 0, a vertical dashed line at this value, labelled with RefLabel
	RefLabel string  // label of the Ref line, e.g. "direct"
}

// A Bar is one row of a Panel.
type Bar struct {
	Label     string     // balancer name, e.g. "tether (XDP)"
	Value     float64    // length of the bar; 0 with a Note means "does not apply"
	Err       [2]float64 // optional min and max (spread) drawn as a whisker; zero means none
	Highlight bool       // draw the bar in HighlightColor instead of BarColor
	Note      string     // optional text after the value, e.g. "n/a"
}

// Colours used for the bars; exported so that tests can find the bars.
var (
	BarColor       = color.RGBA{0x8f, 0xa3, 0xbf, 0xff} // other balancers: slate blue
	HighlightColor = color.RGBA{0xe3, 0x5d, 0x25, 0xff} // tether: orange
)

var (
	textColor  = color.RGBA{0x1f, 0x23, 0x28, 0xff}
	mutedColor = color.RGBA{0x6a, 0x73, 0x7d, 0xff}
	refColor   = color.RGBA{0x44, 0x4d, 0x56, 0xff}
	whiskColor = color.RGBA{0x24, 0x29, 0x2e, 0xff}
)

// Layout, in points; the image is drawn at 72 DPI, so a point is a pixel.
const (
	margin      = 16  // around the whole image
	headingSize = 20  // font size of the heading
	titleSize   = 14  // of a panel's title
	textSize    = 12  // of labels and values
	rowHeight   = 22  // one bar row
	barHeight   = 14  // the bar inside its row
	panelPad    = 64  // a panel's title, axis and padding, beyond its rows
	headingH    = 40  // the heading line and the space under it
	minWidth    = 200 // narrower images are refused
	valueRoom   = 1.3 // the value axis runs to this many times the largest value or whisker
	minBar      = 3   // the shortest bar drawn for a positive value
)

// Render draws the panels under a heading line, stacked vertically, or in a
// grid of two columns if there are more than three, into a PNG of the given
// width and returns the encoded bytes. The height follows from the content.
func Render(heading string, panels []Panel, width int) ([]byte, error) {
	if len(panels) == 0 {
		return nil, errors.New("chart: no panels")
	}
	if width < minWidth {
		return nil, fmt.Errorf("chart: width %d is less than %d", width, minWidth)
	}
	rows := 0
	for i, p := range panels {
		if len(p.Bars) == 0 {
			return nil, fmt.Errorf("chart: panel %d (%q) has no bars", i, p.Title)
		}
		if !finite(p.Ref) || p.Ref < 0 {
			return nil, fmt.Errorf("chart: panel %d (%q): bad Ref %v", i, p.Title, p.Ref)
		}
		for _, b := range p.Bars {
			if !finite(b.Value) || !finite(b.Err[0]) || !finite(b.Err[1]) {
				return nil, fmt.Errorf("chart: panel %d (%q), bar %q: value is not finite", i, p.Title, b.Label)
			}
			if b.Value < 0 || b.Err[0] < 0 || b.Err[1] < 0 {
				return nil, fmt.Errorf("chart: panel %d (%q), bar %q: negative value", i, p.Title, b.Label)
			}
		}
		rows = max(rows, len(p.Bars))
	}
	cols := 1
	if len(panels) > 3 {
		cols = 2
	}
	gridRows := (len(panels) + cols - 1) / cols
	tileH := vg.Length(rows*rowHeight + panelPad)
	height := vg.Length(2*margin+headingH) + vg.Length(gridRows)*tileH
	w := vg.Length(width)
	panelW := (w - 2*margin) / vg.Length(cols)

	plots := make([][]*plot.Plot, gridRows)
	bars := make([][][]*plotter.BarChart, gridRows)
	for r := range plots {
		plots[r] = make([]*plot.Plot, cols)
		bars[r] = make([][]*plotter.BarChart, cols)
		for c := range plots[r] {
			if i := r*cols + c; i < len(panels) {
				p, bs, err := panelPlot(panels[i], panelW)
				if err != nil {
					return nil, err
				}
				plots[r][c], bars[r][c] = p, bs
			}
		}
	}

	img := vgimg.NewWith(vgimg.UseWH(w, height), vgimg.UseDPI(72))
	dc := draw.New(img)
	head := textStyle(headingSize, textColor, true)
	dc.FillText(head, vg.Point{X: margin, Y: height - margin - headingSize}, fit(head, heading, w-2*margin))
	grid := draw.Crop(dc, margin, -margin, margin, -(margin + headingH))
	tiles := draw.Tiles{Rows: gridRows, Cols: cols, PadX: 28, PadY: 30}
	canvases := plot.Align(plots, tiles, grid)
	for r := range plots {
		for c, p := range plots[r] {
			if p == nil {
				continue
			}
			// A value too small to see still gets a bar of a few pixels.
			da := p.DataCanvas(canvases[r][c])
			least := p.X.Max * minBar / float64(da.Max.X-da.Min.X)
			for _, b := range bars[r][c] {
				b.Values[0] = max(b.Values[0], least)
			}
			p.Draw(canvases[r][c])
		}
	}
	var buf bytes.Buffer
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(&buf); err != nil {
		return nil, fmt.Errorf("chart: encode: %w", err)
	}
	return buf.Bytes(), nil
}

// panelPlot builds one panel's plot, the first bar on top, and returns
// its bars.
func panelPlot(pn Panel, width vg.Length) (*plot.Plot, []*plotter.BarChart, error) {
	p := plot.New()
	p.Title.TextStyle = textStyle(titleSize, textColor, true)
	p.Title.Text = fit(p.Title.TextStyle, pn.Title, width*3/5) // centred over the bars
	p.Title.Padding = 6
	small := textStyle(textSize, textColor, false)
	p.X.Tick.Label = textStyle(textSize-2, mutedColor, false)
	p.X.Tick.Label.XAlign, p.X.Tick.Label.YAlign = draw.XCenter, draw.YTop
	p.X.Tick.Marker = plot.TickerFunc(func(min, max float64) []plot.Tick {
		ticks := plot.DefaultTicks{}.Ticks(min, max)
		for i := range ticks {
			if ticks[i].Label != "" {
				ticks[i].Label = tickLabel(ticks[i].Value)
			}
		}
		return ticks
	})
	p.X.LineStyle.Color, p.X.Tick.LineStyle.Color = mutedColor, mutedColor
	p.Y.Tick.Label = small
	p.Y.Tick.Label.XAlign, p.Y.Tick.Label.YAlign = draw.XRight, draw.YCenter
	p.Y.Tick.Length = 0
	p.Y.LineStyle.Width = 0
	p.X.Padding, p.Y.Padding = 0, 0

	n := len(pn.Bars)
	y := func(i int) float64 { return float64(n - 1 - i) } // bar i's row, top down
	labels := make([]string, n)
	top := pn.Ref
	for i, b := range pn.Bars {
		labels[n-1-i] = fit(small, b.Label, width*2/5)
		top = max(top, b.Value, b.Err[0], b.Err[1])
	}
	if top == 0 {
		top = 1
	}
	p.NominalY(labels...)
	p.Y.Min, p.Y.Max = -0.6, float64(n)-0.4
	p.X.Min, p.X.Max = 0, top*valueRoom

	var (
		texts plotter.XYLabels
		all   []*plotter.BarChart
	)
	for i, b := range pn.Bars {
		if b.Value > 0 {
			bars, err := plotter.NewBarChart(plotter.Values{b.Value}, barHeight)
			if err != nil {
				return nil, nil, fmt.Errorf("chart: bar %q: %w", b.Label, err)
			}
			bars.Horizontal = true
			bars.XMin = y(i)
			bars.Color = BarColor
			if b.Highlight {
				bars.Color = HighlightColor
			}
			bars.LineStyle.Width = 0
			p.Add(bars)
			all = append(all, bars)
		}
		end := b.Value
		if lo, hi := min(b.Err[0], b.Err[1]), max(b.Err[0], b.Err[1]); hi > 0 {
			whisker, err := plotter.NewXErrorBars(errBar{
				XYs:     plotter.XYs{{X: b.Value, Y: y(i)}},
				XErrors: plotter.XErrors{{Low: max(b.Value-lo, 0), High: max(hi-b.Value, 0)}},
			})
			if err != nil {
				return nil, nil, fmt.Errorf("chart: bar %q: %w", b.Label, err)
			}
			whisker.LineStyle = draw.LineStyle{Color: whiskColor, Width: 1}
			whisker.CapWidth = barHeight / 2
			p.Add(whisker)
			end = max(end, hi)
		}
		value, note := valueText(pn, b)
		label := strings.TrimSpace(value + "  " + note)
		texts.XYs = append(texts.XYs, plotter.XY{X: end, Y: y(i)})
		texts.Labels = append(texts.Labels, label)
	}
	if pn.Ref > 0 {
		ref, err := plotter.NewLine(plotter.XYs{{X: pn.Ref, Y: -0.6}, {X: pn.Ref, Y: float64(n) - 0.4}})
		if err != nil {
			return nil, nil, fmt.Errorf("chart: ref line: %w", err)
		}
		ref.LineStyle = draw.LineStyle{Color: refColor, Width: 1, Dashes: []vg.Length{4, 3}}
		p.Add(ref)
		if pn.RefLabel != "" {
			rl, err := plotter.NewLabels(plotter.XYLabels{XYs: plotter.XYs{{X: pn.Ref, Y: float64(n) - 0.4}}, Labels: []string{pn.RefLabel}})
			if err != nil {
				return nil, nil, fmt.Errorf("chart: ref label: %w", err)
			}
			rl.TextStyle[0] = textStyle(textSize-2, refColor, false)
			rl.TextStyle[0].XAlign = draw.XCenter
			rl.Offset = vg.Point{Y: 2}
			p.Add(rl)
		}
	}
	values, err := plotter.NewLabels(texts)
	if err != nil {
		return nil, nil, fmt.Errorf("chart: values: %w", err)
	}
	for i := range values.TextStyle {
		values.TextStyle[i] = small
		values.TextStyle[i].YAlign = draw.YCenter
	}
	values.Offset = vg.Point{X: 6}
	p.Add(values)
	return p, all, nil
}

// errBar is one whisker: a point and its horizontal spread.
type errBar struct {
	plotter.XYs
	plotter.XErrors
}

func textStyle(size vg.Length, c color.Color, bold bool) text.Style {
	f := font.Font{Typeface: "Liberation", Variant: "Sans", Size: size}
	if bold {
		f.Weight = xfont.WeightBold
	}
	return text.Style{Color: c, Font: font.From(f, size), Handler: plot.DefaultTextHandler}
}

// fit shortens s with an ellipsis until it is at most w wide.
func fit(sty text.Style, s string, w vg.Length) string {
	if sty.Width(s) <= w {
		return s
	}
	r := []rune(s)
	for len(r) > 0 && sty.Width(string(r)+"…") > w {
		r = r[:len(r)-1]
	}
	return string(r) + "…"
}

func finite(v float64) bool { return !math.IsNaN(v) && !math.IsInf(v, 0) }

// valueText returns the value part and the note part printed after a bar.
func valueText(p Panel, b Bar) (value, note string) {
	if b.Value == 0 && b.Note != "" {
		return "", b.Note
	}
	return FormatValue(b.Value) + p.Unit, b.Note
}

// tickLabel formats an axis tick: FormatValue without trailing zeros.
func tickLabel(v float64) string {
	s := FormatValue(v)
	if strings.Contains(s, ".") {
		s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	}
	return s
}

// FormatValue formats v with 3 significant digits, without exponent:
// 0.0123, 0.123, 1.23, 12.3, 123, 1,230, 12,300.
func FormatValue(v float64) string {
	if v == 0 || !finite(v) {
		return strconv.FormatFloat(v, 'f', -1, 64)
	}
	// Round to 3 significant digits first, so that 9.996 becomes 10.0
	// and not 10.00.
	e := strconv.FormatFloat(v, 'e', 2, 64) // e.g. "-1.23e+04"
	i := strings.IndexByte(e, 'e')
	r, err1 := strconv.ParseFloat(e, 64)
	exp, err2 := strconv.Atoi(e[i+1:])
	if err1 != nil || err2 != nil {
		return e
	}
	if dec := 2 - exp; dec > 0 {
		return strconv.FormatFloat(r, 'f', dec, 64)
	}
	s := strconv.FormatFloat(r, 'f', 0, 64)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	if neg {
		b.WriteByte('-')
	}
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}
